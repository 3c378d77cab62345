"""Serving the promoted model with Ray Serve: see control.py (lifecycle, blue/green), app.py (OpenAI API),
cache.py (response cache), engine.py (transformers / onnxruntime / vLLM), settings.py (knobs)."""
