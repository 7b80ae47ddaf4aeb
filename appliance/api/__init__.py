"""HTTP layer: OpenAI wire types and the routes that translate HTTP to serving calls."""
