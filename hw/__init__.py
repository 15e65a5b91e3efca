"""edge-ota hardware layer: bootloader environments, slots, watchdog, media, serial.

Each piece sits behind a small interface with a real backend and a simulated
twin. No OSError / CalledProcessError escapes this package: backends translate
them into `hw.errors.HwError` subclasses with context.
"""
