"""HTTP plumbing the routes share: media types, bodies read as they arrive (small ones
whole, tensor ones straight into their destination), replies streamed from tensor memory,
Server-Sent Events, query models, the per-stepper reply cache and request metrics."""
