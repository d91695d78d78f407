#!/usr/bin/env python3
"""Lists what a Schemathesis run found, from its NDJSON event stream.

    python3 scripts/schemathesis-failures.py [target/schemathesis/report/events.ndjson]

Prints the test cases per phase, the stateful phase's links, then every failed check
grouped by (operation, check, failure title): how often, in which phases, and the first
request and response in full (method, URL, headers, body; status, headers, body).
Standard library only; the Authorization header is already filtered in the stream.
"""

from __future__ import annotations

import base64
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

DEFAULT = Path(__file__).resolve().parent.parent / "target/schemathesis/report/events.ndjson"
BODY_LIMIT = 600


def decode(content) -> str:
    if content is None:
        return ""
    if isinstance(content, dict) and "$base64" in content:
        raw = base64.b64decode(content["$base64"])
        return raw.decode("utf-8", "backslashreplace")
    return str(content)


def short(text: str, limit: int = BODY_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def answer_summary(interaction: dict) -> str:
    """The status and what the server said was wrong (a problem's `errors` or `detail`)."""
    response = interaction.get("response")
    if not response:
        return "no response"
    text = decode(response.get("content"))
    try:
        body = json.loads(text)
    except ValueError:
        return f"{response['status_code']} {short(text, 120)}"
    if isinstance(body, dict):
        said = body.get("errors") or body.get("detail") or body.get("title")
        return f"{response['status_code']} {json.dumps(said, ensure_ascii=False)}"
    return f"{response['status_code']} {short(text, 120)}"


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    cases_per_phase: Counter[str] = Counter()
    scenarios_per_phase: Counter[str] = Counter()
    groups: dict[tuple[str, str, str], dict] = {}
    phases_of: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    answers_of: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    links = None
    summary = None

    for line in path.read_text().splitlines():
        event = json.loads(line)
        (kind, payload), = event.items()
        if kind == "PhaseFinished" and payload["phase"]["name"] == "stateful":
            links = payload.get("payload")
        if kind == "EngineFinished":
            summary = payload
        if kind != "ScenarioFinished":
            continue
        phase = payload.get("phase") or "?"
        recorder = payload["recorder"]
        scenarios_per_phase[phase] += 1
        cases_per_phase[phase] += len(recorder.get("cases") or {})
        for case_id, checks in (recorder.get("checks") or {}).items():
            for check in checks:
                if check.get("status") != "failure":
                    continue
                failure = (check.get("failure_info") or {}).get("failure") or {}
                operation = failure.get("operation") or recorder.get("label")
                key = (operation, check["name"], failure.get("title", ""))
                phases_of[key][phase] += 1
                answer = (recorder.get("interactions") or {}).get(case_id) or {}
                answers_of[key][answer_summary(answer)] += 1
                if key in groups:
                    continue
                case = (recorder["cases"].get(case_id) or {}).get("value") or {}
                groups[key] = {
                    "code": failure.get("code"),
                    "message": failure.get("message", ""),
                    "case": case,
                    "interaction": (recorder.get("interactions") or {}).get(case_id),
                }

    print(f"events: {path}")
    total = sum(cases_per_phase.values())
    print(f"test cases: {total} in all")
    for phase in sorted(cases_per_phase):
        print(f"  {phase}: {cases_per_phase[phase]} cases in {scenarios_per_phase[phase]} scenarios")
    if links:
        print("stateful phase:", json.dumps(links, ensure_ascii=False)[:2000])
    print()
    print(f"{len(groups)} distinct failures (operation, check, title):")
    for number, (key, group) in enumerate(sorted(groups.items()), start=1):
        operation, check, title = key
        seen = ", ".join(f"{phase} x{count}" for phase, count in sorted(phases_of[key].items()))
        print()
        print(f"{number}. {operation} :: {check} ({group['code']}: {title}) seen {seen}")
        for message_line in group["message"].splitlines():
            print(f"   | {message_line}")
        print("   answers:")
        for answer, count in answers_of[key].most_common(8):
            print(f"     {count:5d} x {answer}")
        interaction = group["interaction"]
        case = group["case"]
        if not interaction:
            print("   (no interaction recorded)")
            continue
        request = interaction["request"]
        url = urlsplit(request["uri"])
        print(f"   request:  {request['method']} {url.path}")
        if url.query:
            print(f"     query:  {parse_qsl(url.query, keep_blank_values=True)}")
        print(f"     headers: {json.dumps(request.get('headers') or {}, ensure_ascii=False)}")
        body = decode(request.get("body"))
        if body:
            print(f"     body:   {short(body)}")
        scenario = ((case.get("meta") or {}).get("phase") or {}).get("data") or {}
        if scenario.get("description"):
            print(f"     generated as: {scenario['description']}")
        response = interaction.get("response")
        if response is None:
            print("   response: none")
            continue
        print(f"   response: {response['status_code']}")
        headers = response.get("headers") or {}
        for name in ("content-type", "allow", "location", "link", "retry-after"):
            if name in headers:
                print(f"     {name}: {', '.join(headers[name])}")
        body = decode(response.get("content"))
        if body:
            print(f"     body:   {short(body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
