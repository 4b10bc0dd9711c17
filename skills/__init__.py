"""Agent skills shipped with mesh-llm (installed as the package `mesh_skills`).

Each subdirectory is one skill in the Agent Skills format (https://agentskills.io): `<name>/SKILL.md`,
YAML front matter (`name`, `description`) and markdown instructions. They are package data, read with
`importlib.resources`; `blackboard.skill.install_skill` copies them to where coding agents look for skills.
"""
