"""The SQuAD files: reading and checking."""
