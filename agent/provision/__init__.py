"""Factory provisioning: a blank device becomes a fleet member (docs/factory.md).

    boot.py      `bootloader init`: the configured bootloader's initial state
    identity.py  the device's private key (made here, mode 0600, never shown), its CSR and certificate
    record.py    the provisioning journal: each step recorded durably, so a re-run continues
    run.py       `provision`: identity, device config, the image into every slot, bootloader, record

Each module's docstring says what it owns. The image is written by the one
installer (`agent.installer.install_all_slots`), never by code of its own.
"""
