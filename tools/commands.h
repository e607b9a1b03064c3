// commands.h: the subcommands of the nanomegatron CLI, one function each.
// Every command returns the process exit status (0 ok, 1 error, 2 usage).
#pragma once

int nm_cmd_init(int argc, char **argv);        // tools/cmd_model.c
int nm_cmd_inspect_model(int argc, char **argv); // tools/cmd_model.c  (--model / --config)
int nm_cmd_forward(int argc, char **argv);     // tools/cmd_forward.c
int nm_cmd_prepare(int argc, char **argv);     // tools/cmd_data.c
int nm_cmd_merge(int argc, char **argv);       // tools/cmd_data.c
int nm_cmd_inspect_data(int argc, char **argv); // tools/cmd_data.c  (--data)
int nm_cmd_tokenizer(int argc, char **argv);   // tools/cmd_tokenizer.c
int nm_cmd_train(int argc, char **argv);       // tools/cmd_train.c
int nm_cmd_eval(int argc, char **argv);        // tools/cmd_train.c
int nm_cmd_sample(int argc, char **argv);      // tools/cmd_sample.c
int nm_cmd_export(int argc, char **argv);      // tools/cmd_export.c
int nm_cmd_plan(int argc, char **argv);        // tools/cmd_plan.c
