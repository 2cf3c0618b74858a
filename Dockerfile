# The tandemd image the deploy/ manifests run (quay.io/tandem/tandemd:<version>).
#
#   docker build -t quay.io/tandem/tandemd:0.1.0 .
#
# Not built by CI (the CI machines have no container engine); the binaries it packages are
# the ones scripts/test.sh builds and tests.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p tandem-node --bins

FROM debian:bookworm-slim
# Host tools the CSI node service runs: losetup and mount (util-linux, mount), blkid,
# mkfs/resize for ext4 (e2fsprogs) and xfs (xfsprogs), fusermount3 (fuse3, for lazy
# unmounts of dead FUSE mounts); curl, grep and sed for deploy/config.yaml's start script.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       ca-certificates curl e2fsprogs fuse3 mount util-linux xfsprogs \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tandemd /src/target/release/tandemctl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/tandemd"]
