# Multi-stage build: compile with the Rust toolchain, ship only the binary on distroless.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/ledger.rs && echo 'fn main() {}' > benches/queue.rs \
    && echo 'fn main() {}' > benches/store.rs \
    && cargo build --release --locked --bin crm-quota-proxy \
    && rm -rf src
COPY src src
# build.rs lays the request path's functions out together (layout/hot-symbols.txt).
COPY build.rs ./
COPY layout layout
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin crm-quota-proxy
# The disk store's directory, private to the runtime user (distroless has no shell to make it).
RUN mkdir -m 0700 /data

# glibc + libgcc, no shell, no package manager; uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/crm-quota-proxy /usr/local/bin/crm-quota-proxy
COPY config/zendesk-container.yaml /etc/crm-quota-proxy/config.yaml
COPY --from=build --chown=nonroot:nonroot /data /var/lib/crm-quota-proxy
VOLUME /var/lib/crm-quota-proxy
USER nonroot:nonroot
# 8080: client traffic; 9090: admin (metrics, status, probes).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/crm-quota-proxy"]
CMD ["run", "--config", "/etc/crm-quota-proxy/config.yaml"]
