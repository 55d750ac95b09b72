# syntax=docker/dockerfile:1
#
# portcullis container image: build with the Rust toolchain, ship only the binary on a
# distroless base (glibc, CA certificates, no shell, no package manager), as uid 65532.
#
#   docker build -t portcullis:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below: they
# keep downloaded crates and compiled dependencies between builds, so a source change
# rebuilds only portcullis itself.

FROM rust:1-bookworm AS build
# etcd-client generates its gRPC code with the system protoc at build time.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portcullis \
    && install -D -m 0755 target/release/portcullis /out/portcullis

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/portcullis /usr/local/bin/portcullis
# gRPC ext_authz + grpc.health.v1, HTTP (/auth, /healthz, /readyz, /metrics), Admin API.
EXPOSE 9191 9192 9180
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/portcullis"]
# The built-in default listens on 127.0.0.1 only; give the image a config that listens on
# 0.0.0.0 (k8s/configmap.yaml does) and run, for example:
#   docker run -v "$PWD/portcullis.yaml:/etc/portcullis/portcullis.yaml:ro" -p 9191:9191 \
#     portcullis:0.1.0 serve --config /etc/portcullis/portcullis.yaml --log-format json
CMD ["serve", "--log-format", "json"]
