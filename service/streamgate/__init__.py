"""streamgate: word-by-word LLM streaming gateway and an OpenAI-compatible simulator."""

__version__ = "0.1.0"
