#!/usr/bin/env bash
# Builds the Busbar container image from the release binary, with no base image and no registry:
# FROM scratch plus the binary (debug info stripped) and the shared libraries `ldd` says it loads,
# at the paths the loader looks for them.
#
#   bash scripts/build-image.sh            # tags busbar:local
#   BUSBAR_IMAGE=busbar:dev bash scripts/build-image.sh
#
# The image runs `busbar server` as uid 65532 with data in /data (declare a volume there),
# listening on 0.0.0.0:9501 (gRPC) and 0.0.0.0:9601 (HTTP: /metrics, /healthz, /readyz). Every
# flag is an environment variable (BUSBAR_ID, BUSBAR_PEERS, BUSBAR_ADVERTISE, ...); set
# BUSBAR_ADVERTISE to the container's DNS name. The same binary is the CLI:
#   docker run --rm --network NET busbar:local --brokers busbar-1:9501 cluster status
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${BUSBAR_IMAGE:-busbar:local}

command -v docker >/dev/null || { echo "build-image: docker not found" >&2; exit 1; }
cargo build --release --locked -p busbar
bin=target/release/busbar

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/etc" "$ctx/owned/data"
# Debug info is most of the binary's 80 MB; the image does not need it.
objcopy --strip-debug "$bin" "$root/usr/local/bin/busbar"

# Every library the binary loads, including the loader itself (ldd's line without "=>").
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || { echo "build-image: ldd listed no libraries; is the binary static?" >&2; }
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# glibc resolves names through NSS; say plainly to use /etc/hosts, then DNS (compose's and
# Kubernetes' service names).
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"

cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
# The data dir belongs to the user the node runs as (a new volume takes this ownership).
COPY --chown=65532:65532 owned/ /
USER 65532:65532
ENV BUSBAR_DATA_DIR=/data \
    BUSBAR_LISTEN=0.0.0.0:9501 \
    BUSBAR_HTTP=0.0.0.0:9601
EXPOSE 9501 9601
VOLUME /data
ENTRYPOINT ["/usr/local/bin/busbar"]
CMD ["server"]
DOCKERFILE

docker build --quiet -t "$tag" "$ctx" >/dev/null
# The image must start: the binary and every library it loads are in it.
docker run --rm "$tag" --version
echo "build-image: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }'))"
