# userhub: one static-ish Rust binary on a distroless runtime.
#
#   docker build -t userhub .
#   docker run -p 8080:8080 -v userhub:/data \
#       -e APP__AUTH__HS256_SECRET="$(openssl rand -base64 48)" userhub
#
# is a complete single-container deployment: SQLite under the /data volume, the
# in-process bus and cache. Point APP__DATABASE__URL, APP__DOCUMENTS__URL,
# APP__CACHE__URL and APP__BUS__URL at PostgreSQL, MongoDB, Redis and RabbitMQ for the
# production stack (see docker-compose.yml and deploy/kubernetes/).
#
# The base images are build arguments, so that a machine without access to an image
# registry can build from local stand-ins (scripts/base-images.sh builds them):
#
#   DOCKER_BUILDKIT=0 docker build --network host \
#       --build-arg BUILDER_IMAGE=userhub-local/builder:bookworm-rust1.95.0 \
#       --build-arg RUNTIME_IMAGE=userhub-local/runtime:cc-debian12-nonroot -t userhub .
#
# The builder needs `cargo` on PATH (and CARGO_HOME set, as the rust images do); the
# runtime needs glibc and libgcc_s (the binary links nothing else), CA certificates
# (for an OIDC provider's JWKS over HTTPS) and user 65532.
ARG BUILDER_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder
# Lets scripts/container-test.sh prune old copies of this stage (its dependency cache).
LABEL org.userhub.stage=builder
WORKDIR /build

# 1. Dependencies only, against placeholder sources: this layer is rebuilt when
#    Cargo.toml or Cargo.lock change, not when the code does. .cargo/config.toml and
#    assets/swagger-ui trim the Swagger UI that a dependency embeds.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY assets assets
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --profile dist --locked \
    && rm -rf src

# 2. The service itself. The binary embeds config/default.toml, the migrations and the
#    console's templates. `touch`: the copied sources may be older than the placeholder
#    build, and cargo compares modification times.
COPY config config
COPY migrations migrations
COPY templates templates
COPY src src
RUN touch src/main.rs src/lib.rs \
    && cargo build --profile dist --locked --bin userhub \
    && mkdir -p /out/data \
    && cp target/dist/userhub /out/userhub

# ---------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title=userhub \
      org.opencontainers.image.description="User registry with asynchronous profile enrichment" \
      org.opencontainers.image.licenses=MIT

# /data holds the embedded SQLite database (users, outbox, in-process bus, profiles).
# Created in the builder and copied with its owner, as the runtime has no shell.
COPY --from=builder --chown=65532:65532 /out/data /data
COPY --from=builder /out/userhub /usr/local/bin/userhub
# config/production.toml is read from APP_CONFIG_DIR (default.toml is compiled in).
COPY config /etc/userhub

ENV APP_ENV=production \
    APP_CONFIG_DIR=/etc/userhub \
    APP__DATABASE__URL=sqlite:///data/userhub.db \
    APP__DOCUMENTS__URL=sqlite:///data/userhub.db

USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# `userhub probe` GETs http://127.0.0.1:${server.port}/health and exits 0 on a 2xx: no
# shell or curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/userhub", "probe"]

ENTRYPOINT ["/usr/local/bin/userhub"]
CMD ["serve"]
