"""Answering over chunks, span decoding, SQuAD metrics, the paired bootstrap."""
