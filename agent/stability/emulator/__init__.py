"""An EMULATOR of Stability AI's REST API on loopback, for tests and offline dry runs: not the real API.

It follows podq's contract, shared/docs/stability-api.md (v1 SDXL 1.0 and v2beta Stable Image: paths, multipart
fields, validation, both `Accept` modes, headers, both generations of error bodies), answers with real images
derived from the input, records every request, and can be told to fail or content-filter the next ones.
"""

from agent.stability.emulator.incoming import FileInfo, RecordedRequest
from agent.stability.emulator.server import StabilityEmulator, main

__all__ = ["FileInfo", "RecordedRequest", "StabilityEmulator", "main"]
