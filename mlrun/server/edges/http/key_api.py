"""HTTP routes of key management: `POST /api/v1/keys`, `GET /api/v1/keys`,
`DELETE /api/v1/keys/{key_id}` (all need the `admin` scope), and `GET /api/v1/whoami` (any valid
key: its id, scopes and project, answered from the in-memory key view without a backend, so a
client can check a key cheaply).

Only translation lives here: decoding, the API key from the headers, status codes. The rules
(who may mint which key, what is stored, how revocation spreads) live in
`mlrun.server.auth.KeyManagement`. The raw key appears in exactly one answer: the 201 of
`POST /api/v1/keys`; no log line here mentions keys at all.

Must not import storage drivers.
"""

from __future__ import annotations

from mlrun.server.edges.http.api import decode_body
from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.keys import KeyManagement, validate_key_id
from mlrun.wire.keys import CreatedKey, CreateKey, KeyInfo, KeyList, WhoAmI


def add_key_routes(router: Router, keys: KeyManagement, authenticator: Authenticator) -> None:
    async def create_key(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        created = await keys.create(principal, decode_body(request.body, CreateKey))
        response = Response.json(created, status=201)
        # The one answer carrying a secret: keep it out of every cache on the way.
        response.headers.append(("cache-control", "no-store"))
        return response

    async def list_keys(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        return Response.json(KeyList(keys=await keys.list_keys(principal)))

    async def revoke_key(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        key_id = validate_key_id(request.path_params["key_id"])
        return Response.json(await keys.revoke(principal, key_id))

    async def whoami(request: Request) -> Response:
        principal = authenticator.authenticate(request.headers)
        return Response.json(WhoAmI(key_id=principal.key_id, scopes=sorted(principal.scopes),
                                    project=principal.project))

    tags = ("keys",)
    router.add("POST", "/api/v1/keys", create_key, RouteSpec(
        summary="Create an API key; the answer is the only time the key is shown",
        scope="admin", request=CreateKey, response=CreatedKey, success_status=201,
        errors=(400, 401, 403, 404, 409), tags=tags))
    router.add("GET", "/api/v1/keys", list_keys, RouteSpec(
        summary="List API keys (never their secrets)", scope="admin", response=KeyList,
        errors=(401, 403), tags=tags))
    router.add("DELETE", "/api/v1/keys/{key_id}", revoke_key, RouteSpec(
        summary="Revoke an API key (every server process refuses it within a few seconds)",
        scope="admin", response=KeyInfo, errors=(400, 401, 403, 404), tags=tags))
    router.add("GET", "/api/v1/whoami", whoami, RouteSpec(
        summary="The presented API key: its id, scopes and project (no backend is asked)",
        scope="any", response=WhoAmI, errors=(401,), tags=tags))
