"""The Shoal controller: REST API (aiohttp), state in Redis, placement of calls on nodes, the archive store,
and the ZMQ hub that node agents keep their links to."""
