"""The browser tier: a package, so that its conftest (the browser fixtures) does not take
the name ``conftest`` from the tests' root conftest that every tier imports."""
