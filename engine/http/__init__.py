"""The HTTP front door: OpenAI's Images API, health and Prometheus metrics, served by uvicorn
beside the ZeroMQ server (`stepweave serve --http`) or by the gateway over many engine servers
(`stepweave gateway`)."""
