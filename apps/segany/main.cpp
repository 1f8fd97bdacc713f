// segany: Segment Anything from the command line. This file only wires the subcommands together
// and turns every failure into one line on stderr and exit code 2.
#include <exception>
#include <iostream>
#include <vector>

#include <CLI/CLI.hpp>

#include "backend/cpu/blas_kernels.h"
#include "commands.h"
#include "segany/error.h"

int main(int argc, char** argv) {
  using namespace segany::cli;
  segany::use_fastest_openblas_kernels(argv);  // may re-execute this program once
  CLI::App app{"segany: Segment Anything in C++. Masks from points, boxes and masks, on the CPU or a GPU.",
               "segany"};
  app.set_version_flag("--version", "segany " SEGANY_VERSION);
  // At most one subcommand; "none" is reported after parsing, so that a misspelt one is named as
  // such rather than reported as a missing subcommand.
  app.require_subcommand(0, 1);
  const std::vector<Command> commands = {add_segment(app), add_everything(app), add_embed(app), add_info(app),
                                         add_convert(app), add_init(app),       add_bench(app)};
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version arrive here too, with exit code 0; everything else is a usage error.
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  if (app.get_subcommands().empty()) {
    std::cerr << "segany: a subcommand is required: segment, everything, embed, info, convert, init or bench\n"
              << "Run with --help for more information.\n";
    return 2;
  }
  try {
    for (const Command& c : commands)
      if (c.app->parsed()) c.run();
  } catch (const std::exception& e) {  // segany::Error and anything the standard library throws
    std::cout.flush();
    std::cerr << "segany: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
