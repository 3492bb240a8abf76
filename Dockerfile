# loket: one image for every stage; the command picks the stage.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends tesseract-ocr tesseract-ocr-ind tesseract-ocr-eng \
        poppler-utils fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY channels ./channels
COPY normalizer ./normalizer
COPY ticketing ./ticketing
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --system --uid 10001 loket
USER loket
ENV LOKET_DATA_DIR=/var/lib/loket LOKET_LOG_JSON=true
EXPOSE 8080
ENTRYPOINT ["loket"]
CMD ["worker", "http"]
