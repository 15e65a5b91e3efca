"""What every edge-ota package shares and is neither hardware nor bundle format:
the error root (`errors`), making foreign text one bounded line (`text`),
crash-safe and symlink-safe file primitives (`fsutil`) and terminal output
(`tty`). Imports only the standard library and itself."""
