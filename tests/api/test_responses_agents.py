"""The OpenAI Agents SDK (``openai-agents``, in the ``dev`` extras) on ``/v1/responses``: one agent run
with a function tool, plain and streamed. Tracing is off: it would export to OpenAI's servers."""

from __future__ import annotations

import agents
import openai
import pytest

from tests.conftest import MODEL_ID, ServedApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_agent_calls_a_function_tool(served: ServedApp) -> None:
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny, 21 C in {city}"

    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key=served.api_key, max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Use the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(MODEL_ID, client),
        model_settings=agents.ModelSettings(
            temperature=0, tool_choice="required", parallel_tool_calls=False, max_tokens=64
        ),
        tool_use_behavior="stop_on_first_tool",
    )
    async with client:
        result = await agents.Runner.run(agent, "What is the weather in Paris?")
        assert calls and result.final_output == f"Sunny, 21 C in {calls[0]}"
        streamed = agents.Runner.run_streamed(agent, "What is the weather in Rome?")
        kinds = [event.type async for event in streamed.stream_events()]
    assert "raw_response_event" in kinds and streamed.final_output.startswith("Sunny, 21 C in ")
