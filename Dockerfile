FROM python:3.11-slim

WORKDIR /app
COPY setup.py README.md ./
COPY migrations ./migrations
COPY pydlit ./pydlit
RUN pip install --no-cache-dir . && rm -rf /app/* \
    && useradd --system --uid 10001 --home-dir /data pydlit \
    && mkdir /data && chown pydlit /data

USER pydlit
VOLUME /data
ENV PYDLIT_HOST=0.0.0.0 PYDLIT_PORT=5001 PYDLIT_DB=/data/pydlit.db
EXPOSE 5001
STOPSIGNAL SIGTERM
CMD ["pydlit"]
