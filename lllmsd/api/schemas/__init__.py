"""OpenAI wire models (pydantic), one module per API family, and their converters to core tasks."""
