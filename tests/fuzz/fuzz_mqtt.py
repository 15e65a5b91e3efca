"""Fuzz the MQTT front end's readers of broker bytes (agent.mqtt.schema): job
documents (`parse_job`, with and without the topic's job id), reports
(`parse_report`) and stream credit messages (`parse_credit`). Whatever the
bytes, each returns a value or raises its documented OtaError; a parsed job
re-encodes (`job_document`) to a document that parses to the same job."""

from __future__ import annotations

import contextlib

from agent.mqtt.schema import encode, job_document, parse_credit, parse_job, parse_report
from ota_common.errors import OtaError
from tests.fuzz._harness import main


def one_input(data: bytes) -> None:
    topic_id = data[:8].hex() if data[:1] == b"\x01" else None
    try:
        job = parse_job(data, topic_id)
    except OtaError:
        pass
    else:
        assert parse_job(encode(job_document(job)), topic_id) == job
    with contextlib.suppress(OtaError):
        parse_report(data)
    parse_credit(data)


if __name__ == "__main__":
    main(one_input)
