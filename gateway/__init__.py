"""The HTTP gateway: aiohttp (on uvloop) in front of the embedding API. Handlers parse,
call the `Engine`, and map errors; they hold no rules. Nothing imports this package."""
