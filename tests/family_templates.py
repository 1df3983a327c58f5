"""Chat templates written for the tests to each model family's documented prompt format, so that the
llama-cpp engine's per-family tool rendering, parsing and reasoning split can run on a model the tests
have (SmolLM2's weights, with these templates as named GGUF templates: setup_models.smollm2_families).

They follow what each family's model card and published template document: where tools, earlier calls
and tool results go, and in what syntax. They are shortened (no date lines, no built-in tools), not
copies of any published template."""

from __future__ import annotations

# Hermes 2 Pro / Qwen 2.5: tools in <tools> in the system turn, calls in <tool_call>, results in
# <tool_response> inside a user turn.
HERMES = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Qwen 3: Hermes-style tools, and thinking in <think>; enable_thinking false closes an empty reasoning
# in the prompt. This one also reads reasoning_effort (as gpt-oss-style templates do) into the system turn.
QWEN3 = (
    HERMES.replace(
        "You are a helpful assistant.{% endif %}",
        "You are a helpful assistant.{% endif %}"
        "{% if reasoning_effort %}\nReasoning: {{ reasoning_effort }}{% endif %}",
    )
    .replace(
        "{% if message.content %}{{ message.content }}{% endif %}",
        "{% if message.content %}{{ message.content.split('</think>')[-1].lstrip() }}{% endif %}",
    )
    .replace(
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "{%- if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
        "{% endif %}",
    )
)

# DeepSeek-R1 distills: the generation prompt opens <think>, so the answer starts inside the reasoning.
THINK_OPENED = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""

# Llama 3.1-3.3 JSON tool calling: tools as JSON in a user turn, a call is {"name", "parameters"},
# results come back in an ipython turn; one call per assistant message.
LLAMA3 = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}<|start_header_id|>system<|end_header_id|>

{% if tools %}Environment: ipython
{% endif %}{{ messages[0].content }}<|eot_id|>
{%- endif %}
{%- if tools %}<|start_header_id|>user<|end_header_id|>

Given the following functions, please respond with a JSON for a function call with its proper arguments that \
best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. \
Do not use variables.

{% for tool in tools %}{{ tool | tojson(indent=4) }}

{% endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{%- if message.tool_calls | length != 1 %}\
{{ raise_exception("This model only supports single tool-calls at once!") }}{% endif %}
<|start_header_id|>assistant<|end_header_id|>

{"name": "{{ message.tool_calls[0].function.name }}", "parameters": \
{{ message.tool_calls[0].function.arguments | tojson }}}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- elif message.role != 'system' %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# Mistral (v3 tokenizer): [AVAILABLE_TOOLS] before the last user turn, calls as [TOOL_CALLS] and a JSON list,
# results in [TOOL_RESULTS] with the call's id.
MISTRAL = """\
{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
[INST] {{ message.content }}[/INST]
{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] [
{%- for call in message.tool_calls %}{"name": "{{ call.function.name }}", "arguments": \
{{ call.function.arguments | tojson }}, "id": "{{ call.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]\
{{ eos_token }}
{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}
{%- elif message.role == 'tool' %}[TOOL_RESULTS] {"content": {{ message.content | tojson }}, \
"call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""

FAMILY_TEMPLATES = {"hermes": HERMES, "qwen3": QWEN3, "think": THINK_OPENED, "llama3": LLAMA3, "mistral": MISTRAL}
