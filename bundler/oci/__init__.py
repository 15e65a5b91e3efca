"""OS images from container images: read an OCI image (layout directory,
`docker save` archive or registry), apply its layers to a staging tree and make
an ext4, erofs or squashfs image of it reproducibly; and bundles stored in a
registry as OCI artifacts (`ota-bundle push`).

Modules: `errors` (the error tree), `blobs` (digests, verifying readers,
layer decompression), `source` (SRC references, layouts and archives),
`registry` (the OCI distribution API client), `apply` (layers onto a staging
tree), `mkfs` (the filesystem tools, reproducibly), `image` (the whole build),
`artifact` (bundles as OCI artifacts)."""
