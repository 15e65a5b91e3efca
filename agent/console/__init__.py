"""The serial console front end (docs/console.md): a line-based console for field
technicians on a UART, over the command table, with confirmation or an Ed25519
challenge for state-changing commands and a framed, resumable bundle upload.

    config.py   the [console] table
    wire.py     the line discipline: bytes -> lines and frames, bounded
    auth.py     confirmation and challenge-response, failure count and lockout
    session.py  what a line means, replies in text or JSON
    upload.py   frames -> the install stream (agent.mqtt.stream's reassembly)
    port.py     the FrontEnd: one serial port, its thread, reopening

Imports nothing itself: agent.config reads the [console] table from config.py.
"""

