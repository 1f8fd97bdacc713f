# Everything segany links against comes from the system (Debian/Ubuntu packages) or,
# for cuSPARSELt, from PyPI's nvidia-cusparselt wheel. scripts/setup.sh installs them.
find_package(OpenMP REQUIRED)
find_package(PNG REQUIRED)
find_package(JPEG REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
find_package(CLI11 CONFIG QUIET)
if(NOT CLI11_FOUND)
  find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED)
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  target_include_directories(CLI11::CLI11 INTERFACE ${CLI11_INCLUDE_DIR})
endif()

# OpenBLAS. Prefer its OpenMP build (Debian/Ubuntu: libopenblas-openmp-dev): it shares one thread
# pool with our own OpenMP loops, where the pthreads build's spinning threads fight them for cores.
# Both builds have the same soname, so the OpenMP one is reached through the RUNPATH.
find_library(SEGANY_OPENBLAS_OPENMP openblas
  PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp NO_DEFAULT_PATH)
if(SEGANY_OPENBLAS_OPENMP)
  add_library(BLAS::BLAS UNKNOWN IMPORTED)
  set_target_properties(BLAS::BLAS PROPERTIES IMPORTED_LOCATION ${SEGANY_OPENBLAS_OPENMP})
  set(SEGANY_BLAS_FLAVOUR "OpenBLAS (OpenMP) ${SEGANY_OPENBLAS_OPENMP}")
else()
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS REQUIRED)
  set(SEGANY_BLAS_FLAVOUR "OpenBLAS ${BLAS_LIBRARIES}")
endif()
find_path(CBLAS_INCLUDE_DIR cblas.h
  PATHS /usr/include/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp /usr/include/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-pthread
        /usr/include/openblas
  REQUIRED)
message(STATUS "segany: BLAS ${SEGANY_BLAS_FLAVOUR}")
set(CMAKE_INSTALL_RPATH_USE_LINK_PATH ON)

# CUDA is optional: "AUTO" builds it when a toolkit is found.
if(SEGANY_CUDA STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(SEGANY_CUDA ON)
  else()
    set(SEGANY_CUDA OFF)
  endif()
endif()
if(SEGANY_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # sm_90a for Hopper's wgmma; sm_80 must keep compiling.
    set(CMAKE_CUDA_ARCHITECTURES 80 90a)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 20)
  find_package(CUDAToolkit REQUIRED)
endif()
message(STATUS "segany: CUDA backend ${SEGANY_CUDA}")
