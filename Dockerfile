FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY migrations ./migrations
COPY mosquitto ./mosquitto
COPY schemas ./schemas
RUN pip install --no-cache-dir . && useradd --system gateway
USER gateway
EXPOSE 8080
CMD ["gateway", "run"]
