"""Layer 2, the one evaluation path: generation (HF or vLLM), decoding rules, scoring into typed rows, metrics
computed from rows gathered across processes, statistics, SLOT maths and teacher forcing. Imports only `core`,
`tasks` and `models`; no Lightning."""
