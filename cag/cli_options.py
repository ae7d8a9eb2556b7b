"""The options `cag` commands share, declared once: the same flag, type, bounds and help in every command.

Why a module of its own: typer reads options from each command's parameters, so a flag taken by five
commands was declared five times, and the copies drifted. Here each is one `Annotated` type.
"""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

MODEL_HELP = ("Model: the default SmolLM2-135M-Instruct, a GGUF file (llama.cpp), ollama:NAME[:TAG] (a model in the "
              "local Ollama store), a Hugging Face id or a local model folder (transformers).")
THREADS_HELP = "CPU threads to compute with (default: $CAG_THREADS, else the engine's choice)."
DRAFT_HELP = ("Draft each answer's next tokens from the knowledge and verify them in one step (the same answer, "
              "sooner; default on unless CAG_DRAFT=0). --no-draft: one token per step.")
KV_TYPE_HELP = "GGUF models: the KV cache type, f16, bf16 or q8_0 (default f16)."
CONTEXT_HELP = "GGUF models: positions per answer (default: the model's, at most 8192)."
DEVICE_HELP = "cpu, cuda, cuda:1, … (default: cuda if present)."
DTYPE_HELP = "float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda; ask uses the build's)."
REDIS_HELP = "Redis URL (redis://host:port/db) to share caches through; default: $CAG_REDIS_URL."
TENANT_HELP = ("Whose knowledge base of that name: a tenant's, created through the server (`cag ls` shows "
               "tenants). Default: the one built with the CLI, else the open server's (public).")
SYSTEM_HELP = ("A system message: instructions for the answer (tone, language, format), placed after the cached "
               "knowledge, so the cache still serves it.")
SOURCES = 3  # cag.kb.grounding.DEFAULT_SOURCES, MAX_SOURCES and MODES: not imported here, as importing
MAX_SOURCES = 20  # grounding would slow every command's start (`cag --help` included); a test keeps them equal
UNSUPPORTED_MODES = ("flag", "refuse")
SOURCES_HELP = (f"Passages of the knowledge base to show under each answer, 0 to {MAX_SOURCES} (0: none; the "
                "support is still checked).")
UNSUPPORTED_HELP = ("An answer its sources do not support: flag shows it with a warning; refuse answers that the "
                    "knowledge base does not contain the answer instead.")

Model = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP)]
Device = Annotated[Optional[str], typer.Option("--device", help=DEVICE_HELP)]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help=DTYPE_HELP)]
KvType = Annotated[Optional[str], typer.Option("--kv-type", metavar="[f16|bf16|q8_0]", help=KV_TYPE_HELP)]
Context = Annotated[Optional[int], typer.Option("--context", min=16, help=CONTEXT_HELP)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help=THREADS_HELP)]
Redis = Annotated[Optional[str], typer.Option("--redis", help=REDIS_HELP)]
Tenant = Annotated[Optional[str], typer.Option("--tenant", metavar="TENANT", help=TENANT_HELP)]
Name = Annotated[str, typer.Argument(help="Knowledge base name.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy (default).")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0,
                                     help="Nucleus sampling threshold (with --temperature).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for repeatable sampling.")]
Stop = Annotated[Optional[List[str]], typer.Option("--stop", help="End each answer before this text (repeatable, "
                                                                  "up to 4).")]
System = Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help=SYSTEM_HELP)]
Sources = Annotated[int, typer.Option("--sources", metavar="N", help=SOURCES_HELP)]
Unsupported = Annotated[str, typer.Option("--unsupported", metavar="[flag|refuse]", help=UNSUPPORTED_HELP)]
Draft = Annotated[bool, typer.Option("--draft/--no-draft", help=DRAFT_HELP)]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per answer on stdout.")]
