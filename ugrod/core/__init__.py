"""The functional core: pure data and decisions. No I/O, no clock, no asyncio; imports only itself,
the standard library, msgspec and immutables.
"""
