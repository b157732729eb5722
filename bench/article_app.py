"""The seed article's design, kept as the article wrote it: the benchmark's baseline.

Run as the article says (with the maintained worker package):
    gunicorn bench.article_app:app -w 2 -k uvicorn_worker.UvicornWorker
The upstream comes from OPENAI_BASE_URL / OPENAI_API_KEY, which the SDK reads; the benchmark
points them at the simulator. Deliberately not improved: the SDK builds objects for every chunk,
errors are dressed up as model output, and the client disconnect is not checked.
"""

import os

from dotenv import load_dotenv
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from openai import AsyncOpenAI
from pydantic import BaseModel

load_dotenv()

# Initialize the async OpenAI client
client = AsyncOpenAI(api_key=os.getenv("OPENAI_API_KEY"))


async def stream_llm_response(user_prompt: str):
    """Asynchronously streams the LLM response word by word."""
    try:
        stream = await client.chat.completions.create(
            model="gpt-4-turbo",  # Or your preferred model
            messages=[{"role": "user", "content": user_prompt}],
            stream=True,
        )
        async for chunk in stream:
            content = chunk.choices[0].delta.content
            if content:
                yield content
    except Exception as e:  # the article's code, kept as written
        print(f"An error occurred: {e}")
        yield "Error: Could not retrieve response."


app = FastAPI()


class ChatRequest(BaseModel):
    prompt: str


@app.post("/v1/chat/stream")
async def chat_stream_endpoint(request: ChatRequest):
    """Endpoint to handle the streaming chat request."""
    return StreamingResponse(stream_llm_response(request.prompt), media_type="text/plain")
