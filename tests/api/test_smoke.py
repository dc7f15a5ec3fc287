def test_health(app_client):
    r = app_client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_live_server_health(live_server):
    import httpx

    assert httpx.get(f"{live_server.url}/healthz").json()["steppers"] >= 0
