"""edge-ota bundler: builds signed `.otab` bundles on a build host (`ota-bundle`)."""
