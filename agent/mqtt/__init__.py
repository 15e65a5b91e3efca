"""The MQTT protocol layer of the agent: topic layout (topics), wire schema and
job lifecycle (schema), the durable job journal (journal), the broker
connection (link), incoming jobs (intake), outbox delivery (reporter), the
`[mqtt]` configuration (config) and their assembly (channel). The protocol is
documented in docs/mqtt.md.

The application layer meets it at three small interfaces: `JobSink.submit(job)`
(intake.py) receives jobs, `Outbox` (`pending()`, `ack(seq)`, reporter.py) is
where reports come from, and `Journal.set_status` records a job's progress.
"""
