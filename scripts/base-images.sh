#!/usr/bin/env bash
# Builds local stand-ins for the two base images of the Dockerfile, for machines that
# reach package registries but no container image registry:
#
#   builder  userhub-local/builder:bookworm-rust<VERSION>  (stands in for rust:<V>-slim-bookworm)
#            a debootstrap Debian 12 root (gcc, libc6-dev, pkg-config, ca-certificates)
#            + the host's Rust toolchain (bin/ and lib/ of `rustc --print sysroot`)
#            + the host's CA bundle, through which the crate registry is reached here
#   runtime  userhub-local/runtime:cc-debian12-nonroot     (stands in for
#            gcr.io/distroless/cc-debian12:nonroot)
#            FROM scratch: glibc, libgcc_s, Debian's CA certificates, /etc/passwd with
#            nonroot (65532), /tmp; USER 65532, like distroless' :nonroot tag
#
# Upstream names (rust:…, gcr.io/…) are never used as tags. Both are rebuilt only when
# missing or when their recipe changed (this script, the toolchain, the host CA bundle):
# the recipe hash is kept in the image label org.userhub.base-recipe.
#
# Usage: scripts/base-images.sh            build what is missing, then print
#                                           BUILDER_IMAGE=… and RUNTIME_IMAGE=… on stdout
#        scripts/base-images.sh --print    only print the names
#        scripts/base-images.sh --force    rebuild both
#
# Needs root (debootstrap, docker). Installs debootstrap and docker.io with apt when
# missing, and starts a Docker engine for the time of the build if none answers.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/target/base-images"
# shellcheck source=scripts/docker-engine.sh
source "$root/scripts/docker-engine.sh"

say() {
    echo "base-images: $*" >&2
}

mode=build
case "${1:-}" in
    "") ;;
    --print) mode=print ;;
    --force) mode=force ;;
    *)
        echo "usage: $0 [--print|--force]" >&2
        exit 2
        ;;
esac

sysroot="$(cd "$root" && rustc --print sysroot)"
rust_version="$(cd "$root" && rustc --version | awk '{print $2}')" # e.g. 1.95.0
builder_image="${USERHUB_BUILDER_IMAGE:-userhub-local/builder:bookworm-rust$rust_version}"
runtime_image="${USERHUB_RUNTIME_IMAGE:-userhub-local/runtime:cc-debian12-nonroot}"
host_ca=/etc/ssl/certs/ca-certificates.crt
suite=bookworm
packages=gcc,libc6-dev,ca-certificates,pkg-config

print_names() {
    echo "BUILDER_IMAGE=$builder_image"
    echo "RUNTIME_IMAGE=$runtime_image"
}

if [ "$mode" = print ]; then
    print_names
    exit 0
fi

# What each image is made of; a change rebuilds it.
recipe="$(
    {
        # Contents only, never paths: a clone elsewhere must find the same recipe.
        sha256sum <"$root/scripts/base-images.sh"
        echo "$suite $packages"
        "$sysroot/bin/rustc" -vV
        "$sysroot/bin/cargo" -V
        sha256sum <"$host_ca" 2>/dev/null || echo "no host CA bundle"
    } | sha256sum | cut -c1-16
)"

label_of() {
    docker image inspect -f '{{ index .Config.Labels "org.userhub.base-recipe" }}' "$1" 2>/dev/null || true
}

cleanup() {
    local status=$?
    rm -rf "$state/stage-builder" "$state/stage-runtime"
    docker_engine_stop
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

docker_engine_ensure

need_builder=true
need_runtime=true
if [ "$mode" != force ]; then
    [ "$(label_of "$builder_image")" = "$recipe" ] && need_builder=false
    [ "$(label_of "$runtime_image")" = "$recipe" ] && need_runtime=false
fi
if ! $need_builder && ! $need_runtime; then
    say "up to date (recipe $recipe): $builder_image, $runtime_image"
    print_names
    exit 0
fi

# --- a Debian 12 root, shared by both images (kept under target/ between runs) -------
rootfs="$state/rootfs-$suite"
if [ ! -f "$rootfs/.userhub-complete" ] || [ "$(cat "$rootfs/.userhub-complete")" != "$suite $packages" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap (apt)"
        apt-get install -y -q debootstrap >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q debootstrap >/dev/null; }
    fi
    # The mirror this machine's apt uses (debootstrap's own default otherwise).
    mirror="${DEBIAN_MIRROR:-}"
    if [ -z "$mirror" ]; then
        mirror="$(awk '$1 == "URIs:" && $2 !~ /security/ { print $2; exit }' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
    fi
    if [ -z "$mirror" ]; then
        mirror="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
            /etc/apt/sources.list 2>/dev/null || true)"
    fi
    rm -rf "$rootfs"
    mkdir -p "$state"
    say "debootstrap --variant=minbase --include=$packages $suite ${mirror:-(default mirror)}"
    started=$SECONDS
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" ${mirror:+"$mirror"} \
        >"$state/debootstrap.log" 2>&1 || {
        say "debootstrap failed; end of $state/debootstrap.log:"
        tail -n 20 "$state/debootstrap.log" >&2
        exit 1
    }
    # apt's package cache and lists are not needed in an image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    echo "$suite $packages" >"$rootfs/.userhub-complete"
    say "debootstrap done in $((SECONDS - started)) s"
fi

# --- builder ----------------------------------------------------------------------------
if $need_builder; then
    stage="$state/stage-builder"
    rm -rf "$stage"
    # Hard links: no copy of the 300 MB root or the 600 MB toolchain.
    cp -al "$rootfs" "$stage" 2>/dev/null || { rm -rf "$stage" && cp -a "$rootfs" "$stage"; }
    rm -f "$stage/.userhub-complete"
    mkdir -p "$stage/usr/local/rust" "$stage/usr/local/cargo/bin"
    cp -al "$sysroot/bin" "$sysroot/lib" "$stage/usr/local/rust/" 2>/dev/null ||
        cp -a "$sysroot/bin" "$sysroot/lib" "$stage/usr/local/rust/"
    # The host's CA bundle: here the registry is reached only through it. A copy, not a
    # link, so that the rootfs' own (Debian's) bundle stays for the runtime image.
    rm -f "$stage/etc/ssl/certs/ca-certificates.crt"
    cp "$host_ca" "$stage/etc/ssl/certs/ca-certificates.crt"
    say "importing $builder_image (toolchain $rust_version from $sysroot)"
    started=$SECONDS
    tar --numeric-owner -C "$stage" -cf - . |
        docker import \
            --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV CARGO_HOME=/usr/local/cargo' \
            --change 'ENV LANG=C.UTF-8' \
            --change "ENV RUST_VERSION=$rust_version" \
            --change "LABEL org.userhub.base-recipe=$recipe" \
            --change 'LABEL org.userhub.stands-in-for=rust-slim-bookworm' \
            --change 'CMD ["bash"]' \
            - "$builder_image" >/dev/null
    rm -rf "$stage"
    say "built $builder_image in $((SECONDS - started)) s"
fi

# --- runtime ----------------------------------------------------------------------------
if $need_runtime; then
    stage="$state/stage-runtime"
    rm -rf "$stage"
    mkdir -p "$stage"/{etc/ssl/certs,usr/lib/x86_64-linux-gnu,usr/lib64,tmp,home/nonroot,root}
    ln -s usr/lib "$stage/lib"
    ln -s usr/lib64 "$stage/lib64"
    # The shared objects of glibc (libc6) and libgcc_s (libgcc-s1), as Debian ships them.
    libs="$(chroot "$rootfs" dpkg-query -L libc6 libgcc-s1 |
        grep -E '^(/usr)?/lib/x86_64-linux-gnu/[^/]+\.so(\.[0-9]+)*$' | sort -u)"
    for lib in $libs; do
        cp -aL "$rootfs$lib" "$stage/usr/lib/x86_64-linux-gnu/"
    done
    ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$stage/usr/lib64/ld-linux-x86-64.so.2"
    # Debian's CA bundle (the one distroless ships), not the host's.
    cp -L "$rootfs/etc/ssl/certs/ca-certificates.crt" "$stage/etc/ssl/certs/"
    cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$stage/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
    echo 'hosts: files dns' >"$stage/etc/nsswitch.conf"
    chmod 1777 "$stage/tmp"
    chmod 700 "$stage/root"
    chown 65532:65532 "$stage/home/nonroot"
    say "importing $runtime_image ($(echo "$libs" | wc -w) shared objects)"
    tar --numeric-owner -C "$stage" -cf - . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
            --change 'USER 65532:65532' \
            --change 'WORKDIR /home/nonroot' \
            --change "LABEL org.userhub.base-recipe=$recipe" \
            --change 'LABEL org.userhub.stands-in-for=distroless-cc-debian12-nonroot' \
            - "$runtime_image" >/dev/null
    rm -rf "$stage"
    say "built $runtime_image ($(docker image inspect -f '{{ .Size }}' "$runtime_image") bytes)"
fi

print_names
