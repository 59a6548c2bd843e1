"""The online half of SPINN (DESIGN.md parts 4 and 7): asyncio adapters over pure logic.

``tracker`` (one answer per frame, the server/local race, deadlines), ``run_summary``
(status line, summary) and ``backoff`` are pure; ``server`` and ``device`` are
the asyncio layers that drive them with sockets, an executor and a clock.
"""
