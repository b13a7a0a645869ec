"""Exporters a model server imports to publish the signals kvgate reads (no kvgate runtime
needed on the GPU host): ``torch_memory`` serves allocator fragmentation as Prometheus gauges."""
