# Prometheus from Debian's package, on the base local-base.sh makes: for machines
# that cannot pull prom/prometheus (set PROMETHEUS_IMAGE to this image in Compose).
#   docker build -f deploy/docker/prometheus.Dockerfile \
#       --build-arg BASE_IMAGE="$(deploy/docker/local-base.sh)" -t convserve-prometheus:local deploy
# It runs like the official image: as nobody, data in /prometheus (also where
# Debian's build stores it by default, /var/lib/prometheus/metrics2, points), the
# config mounted at /etc/prometheus/prometheus.yml.
ARG BASE_IMAGE=convserve-base:bookworm
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus=2.42.0+ds-5+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown 65534:65534 /prometheus \
    && rm -rf /var/lib/prometheus/metrics2 \
    && ln -s /prometheus /var/lib/prometheus/metrics2
VOLUME ["/prometheus"]
WORKDIR /prometheus
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
