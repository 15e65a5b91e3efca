"""`ota-console`: the technician's side of the device's serial console
(docs/console.md): `link.py` the JSON-mode conversation over pyserial (answers
confirmations and signs challenges), `put.py` the framed, resumable bundle upload,
`cli.py` the command line. Shares only `ota_common.frames` with the device side.
"""
