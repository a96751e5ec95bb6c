"""`spanflow study`: declared experiments on one pipeline, and the findings they support."""
