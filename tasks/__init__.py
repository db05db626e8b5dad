"""Layer 2, what a reasoning task is: data readers, prompt formatting, answer extraction and scoring, the
planning-token spec and learned step types. Imports only `core`; no Lightning."""
