# batchd: one image for API processes (`batchd serve`) and workers (`batchd worker`).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . && useradd --create-home batchd && mkdir -p /data && chown batchd /data
USER batchd
ENV BATCHD_DATA_DIR=/data BATCHD_HOST=0.0.0.0
EXPOSE 8080
ENTRYPOINT ["batchd"]
CMD ["serve"]
