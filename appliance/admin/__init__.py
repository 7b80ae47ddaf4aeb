"""The admin web page (server-rendered, htmx)."""
