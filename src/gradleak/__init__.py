"""gradleak: play the curious federated-learning server and measure what leaks from client updates."""

__version__ = "0.1.0"
