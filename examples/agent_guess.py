"""Your own environment and tool: guess a secret number with a `hint` tool, trained with
multi-turn GRPO. Dataset rows: {"secret": 37}."""
from trustrl.algorithms.agent import AgentGRPOTrainer
from trustrl.config.agent import AgentGRPOConfig
from trustrl.envs.tools import ToolEnv


class GuessEnv(ToolEnv):
    """The model may call `hint` (at most 6 times), then answers with the number."""

    max_tool_calls = 6

    @property
    def tools(self):
        return [self.hint]

    def hint(self, guess: int) -> str:
        """Compare a guess with the secret number.

        Args:
            guess: the number to compare with the secret.
        """
        return "higher" if guess < self.row["secret"] else "not higher"

    def task(self, row) -> str:  # the first observation: the row is the episode's task
        return "Guess my number between 0 and 99."

    def grade(self, answer: str, row) -> tuple[float, bool]:  # a turn without a tool call
        right = answer.strip() == str(row["secret"])
        return (1.0 if right else 0.0), right


if __name__ == "__main__":
    config = AgentGRPOConfig(model="path/to/chat-model", dataset="secrets.jsonl", output_dir="runs/guess",
                             max_turns=8, max_completion_length=64, max_episode_tokens=2048, group_size=8)
    AgentGRPOTrainer(config, env=GuessEnv).train()
