#!/usr/bin/env python3
"""Writes the served OpenAPI document with the contract fixes Schemathesis asks for.

    curl -s http://127.0.0.1:PORT/api-docs/openapi.json > /tmp/served.json
    python3 scripts/schemathesis-proposed-openapi.py /tmp/served.json /tmp/proposed.json [--links]
    SCHEMATHESIS_SCHEMA=/tmp/proposed.json scripts/schemathesis-local.sh target/debug/userhub

A reference for changing the utoipa annotations, to be deleted once the served document
carries these changes: run against the unchanged server, the proposed document leaves
only the failures that need a server change (405 for undeclared methods). Standard
library only.

- `{uuid}` path parameters and the `cursor` query parameter: `format: uuid`.
- `q`: at most 255 characters once trimmed, no control characters (the server's rule).
- `after` (dead letters, in-process bus): a whole number, as `str::parse::<i64>` takes it.
- `CreateUserRequest.name`: 3-100 characters once trimmed, no control characters;
  `CreateUserRequest.email`: `format: email`, at most 255 characters.
- `--links`: explicit OpenAPI links for the stateful phase (POST -> reads of the new
  user, list -> first user, dead-letter list -> replay of the first one).
"""

import json
import sys

# Rust's str::trim() strips Unicode White_Space; char::is_control() is category Cc.
# Spelt out rather than `\s`, which in Python also matches U+001C-U+001F (not trimmed).
WS = r"\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000"
CC = r"\u0000-\u001F\u007F-\u009F"
NAME = rf"^[{WS}]*[^{WS}{CC}][^{CC}]{{1,98}}[^{WS}{CC}][{WS}]*$"
QUERY = rf"^[{WS}]*(?:[^{WS}{CC}](?:[^{CC}]{{0,253}}[^{WS}{CC}])?)?[{WS}]*$"
DEAD_LETTER_ID = r"^[+-]?[0-9]{1,18}$"


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    doc = json.load(open(sys.argv[1]))
    paths = doc["paths"]

    def param(path: str, method: str, name: str) -> dict:
        for parameter in paths[path][method]["parameters"]:
            if parameter["name"] == name:
                return parameter["schema"]
        raise KeyError(f"{method.upper()} {path}: no parameter {name}")

    for path in ("/api/users/{uuid}", "/api/users/{uuid}/profile", "/users/enriched/{uuid}"):
        param(path, "get", "uuid")["format"] = "uuid"
    param("/api/users", "get", "cursor")["format"] = "uuid"
    param("/api/users", "get", "q")["pattern"] = QUERY
    param("/admin/dead-letters", "get", "after")["pattern"] = DEAD_LETTER_ID

    body = doc["components"]["schemas"]["CreateUserRequest"]["properties"]
    body["name"]["pattern"] = NAME
    body["email"].update({"format": "email", "maxLength": 255})

    if "--links" in sys.argv[3:]:
        def response(path: str, method: str, status: str) -> dict:
            return paths[path][method]["responses"][status]

        new_user = {"uuid": "$response.body#/uuid"}
        response("/api/users", "post", "201")["links"] = {
            "GetUser": {"operationId": "get_user", "parameters": new_user},
            "GetUserProfile": {"operationId": "get_user_profile", "parameters": new_user},
            "GetEnrichedProfile": {"operationId": "get_enriched_profile", "parameters": new_user},
        }
        response("/api/users", "get", "200")["links"] = {
            "GetFirstUser": {"operationId": "get_user", "parameters": {"uuid": "$response.body#/0/uuid"}},
        }
        response("/admin/dead-letters", "get", "200")["links"] = {
            "ReplayFirst": {"operationId": "replay_dead_letter", "parameters": {"id": "$response.body#/0/id"}},
        }

    with open(sys.argv[2], "w") as out:
        json.dump(doc, out, indent=1)
        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
