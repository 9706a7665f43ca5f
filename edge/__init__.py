"""Edge: stateless WebSocket nodes fanning channels out to browsers."""
